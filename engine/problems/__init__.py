"""The contract: validated problem types (what a backend op receives) and the argument checks that
build them. Imports no backend."""
