"""Every use of a private name of trl, transformers, accelerate or peft lives here, each one checked by
tests/test_integrations.py against the installed version: a release that renames one fails that test, not a
user's run."""
