"""What the tasks share: the CLI with ``export``, optimizer helpers, recipe callbacks."""
