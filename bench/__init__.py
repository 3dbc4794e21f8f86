"""`make bench`: throughput, latency and memory of the real pipeline on both brokers.

Every figure is printed beside a reference measured in the same run (the machine is shared
and noisy): end-to-end records/s beside the raw QoS1 rate of the same broker, pipeline
latency beside the broker's own round trip at the same offered load, peak RSS beside the
idle RSS of the same process.
"""
