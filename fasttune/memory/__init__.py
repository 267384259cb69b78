"""Memory: the plan of one training step before any weights load (plan), the changes that make it fit a card (fit), and what a live model holds (measure)."""
