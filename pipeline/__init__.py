"""r1flow orchestration: config, versioned store, Prefect flows, UI reporting, CLI."""
