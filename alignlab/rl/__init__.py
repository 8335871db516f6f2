"""Reinforcement-learning loops on accelerate that TRL lacks or that alignlab runs its own way: PPO (ppo.py)."""
