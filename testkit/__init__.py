"""What the tests and the benchmarks share (never the library): real servers and clusters on free local ports
(`realstack`) and the fault scenarios of a long sweep (`faults`). Run from the repository's root."""
