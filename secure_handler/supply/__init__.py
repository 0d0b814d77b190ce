"""The supply chain: archive, verify, scan, lock and sign, before anything in a MAR runs."""
