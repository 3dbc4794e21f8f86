"""Device profiles: one folder per kind of hangar device, the one place that knows it.

A profile holds, side by side, what it takes to turn what a device sends into contract records:

* `parser.py`: the device's format parsed into typed results, never an exception (`Malformed`);
* `simulator.py`: an encoder producing what the real device sends (used by tests, benches and
  the simulators), so every parser is tried against its own device's shapes;
* `mapping.py`: the `RawRead`s a payload holds and the device contract v1 body a read makes
  within a work session;
* `profile.py`: its `Profile` descriptor (`base.Profile`).

`registry.PROFILES` is the one list ingest, the CLI (`mro-edge devices add --profile`), the
simulators and the tests use: a new device kind is one folder plus one line there (and its topic
kind in `shared.runtime.topics`, which the registry's test checks).

The `__init__` of each profile folder imports nothing, so `base` may import a profile's parser
types (the `RawRead.source` union) without an import cycle.
"""
