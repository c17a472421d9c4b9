"""Architectures (AST family in ast/, HTS-AT in htsat/) and the weight formats --init reads and exports write."""
