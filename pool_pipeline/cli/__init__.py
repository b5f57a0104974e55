"""The console commands: each parses its options, builds connectors and runs the one replicate loop."""
