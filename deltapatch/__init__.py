"""deltapatch."""
