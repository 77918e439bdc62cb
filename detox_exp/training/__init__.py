"""What every training method shares: the loop, the policy wrapper, the guard, saving."""
