"""Training of the calcium CNN: simulator, CASCADE-format ground truth, example bank, fit, command."""
