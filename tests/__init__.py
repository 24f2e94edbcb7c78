"""The test suite (a package, so that `tests.helpers` is this one and not a `tests` that some wheel installs)."""
