"""A trivial device type that lives entirely in this test package: the daemon, the CLI, the config loader,
`pvback status` and the metrics endpoint must serve it with no change anywhere else."""
