"""STUN/TURN wire codec and sans-I/O client helpers shared by the relay and the agent."""
