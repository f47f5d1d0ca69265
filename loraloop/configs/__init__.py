"""Package data: example configuration files that travel with the wheel."""

from pathlib import Path

DEMO_ARMS = Path(__file__).with_name("demo-arms.toml")
"""The demo's arms (friendly, formal, brief system prompts); a template for your own."""
