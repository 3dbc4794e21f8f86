"""Harnesses the tests and `make bench` share: real components started in-process, never stand-ins."""
