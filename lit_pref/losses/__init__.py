"""Loss functions for preference optimisation and RL from feedback."""
