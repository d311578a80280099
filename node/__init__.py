"""mednode node package."""
