"""mednode inference package."""
