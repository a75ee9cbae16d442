"""matplotlib figures, one module per topic. Each function returns its Figure."""
