"""Graph exporters: one module per graph format behind the ``Exporter`` protocol."""
