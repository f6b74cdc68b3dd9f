"""Sample stores for `billrun demo` and the tests: a seeded realistic month and its showcase
customers."""
