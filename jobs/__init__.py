"""Ray Data jobs and the sdbatch CLI."""
