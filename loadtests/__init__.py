"""Load tests with simulated users: throughput, latency percentiles, learning under load.

`python -m loadtests run|stack|compare|capacity`; see loadtests/README.md.
"""
