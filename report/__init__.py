"""Event files → tables, figures and a lab report."""
