"""mednode dicom_io package."""
