"""Test harnesses shipped with the package: datapath and receive-path fuzzing (docs/fuzzing.md)."""
