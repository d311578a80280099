"""Web dashboard, REST API and metrics of mednode."""
