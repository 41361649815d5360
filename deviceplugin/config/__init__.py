"""Node configuration engine: applies a node's desired state (VF counts, vfio binding) safely.

``facts`` reads what the host is using, ``hostdev.policy.plan`` decides, ``executor`` writes
sysfs with read-back checks, ``memory`` remembers original drivers, ``apply`` runs the rounds.
"""
