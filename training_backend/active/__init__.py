"""Active learning: acquisition strategies over stored outputs, the label-efficiency curve, simulated annotation sessions and their synthetic scribbles."""
