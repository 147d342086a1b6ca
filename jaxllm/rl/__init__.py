"""On-policy RL: rollouts, rewards, advantage estimators, low-probability-token methods."""
