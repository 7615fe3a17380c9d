"""`python -m fusedopt <command> [options]`.

A command is a module exposing add_arguments(parser) and run(args), registered in COMMANDS with a
one-line help. Only the chosen command's module is imported, so the optional dependencies of one
command (a benchmark's third-party optimizers, say) never slow down or break another.
"""
from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "demo": ("fusedopt.demo", "train a tiny char-level transformer with torch.optim.AdamW and "
                              "fusedopt.AdamW from the same init and compare loss, speed, memory"),
    "bench": ("fusedopt.benchmarks.cli", "time every fusedopt optimizer's step against every installed peer "
                                        "(torch.optim, bitsandbytes, torchao, lion-pytorch); tables, JSON, plot"),
    "memory": ("fusedopt.memory_cli", "plan per-rank memory (weights, grads, master, optimizer states) "
                                      "of a model under ZeRO stages 0..3, for every fusedopt optimizer"),
}


def main(argv: list[str] | None = None):
    """Run a command; returns what its run() returns (the demo's results, for tests)."""
    top = argparse.ArgumentParser(
        prog="python -m fusedopt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<10}{help}" for name, (_, help) in COMMANDS.items()),
    )
    top.add_argument("command", choices=COMMANDS, nargs="?")
    top.add_argument("args", nargs=argparse.REMAINDER, help="the command's options (see <command> -h)")
    ns = top.parse_args(argv)
    if ns.command is None:  # argparse would list the optional remainder as required too
        top.error(f"choose a command: {', '.join(COMMANDS)}")

    module_name, help = COMMANDS[ns.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m fusedopt {ns.command}", description=help)
    module.add_arguments(parser)
    return module.run(parser.parse_args(ns.args))


if __name__ == "__main__":
    main()
