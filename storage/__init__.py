"""mednode storage package."""
