"""Transport security helpers: a small private CA and the certificates it issues."""
