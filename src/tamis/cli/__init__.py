"""Command-line interface: one module per command group; each command parses, calls one library
function and reports."""
