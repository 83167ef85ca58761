"""The servers the benchmarks measure and how clients talk to them.

- :mod:`bench.baselines.websockets_broadcast`: the websockets library's server with ``broadcast()``.
- :mod:`bench.baselines.bare_frame_writer`: the Python ceiling, frames written straight to
  transports (optionally coalesced).
- :mod:`bench.baselines.servers`: the registry of measurable servers (the baselines, quicksilver,
  nats-server and Mosquitto when installed) and how to launch each on a free port.
- :mod:`bench.baselines.wire`: the client side of each server's protocol, for load generators.
"""
