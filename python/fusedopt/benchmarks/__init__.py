"""`python -m fusedopt bench`: step time of every fusedopt optimizer against every installed peer.

Suites (one module each): adamw, lion, adam8bit. cli.py runs them; harness.py holds what they
share; common.py the timers, bandwidth probe and environment stamp; plot.py the roofline plot.
"""
