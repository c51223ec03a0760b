"""Kopf operator for InternVLFineTune and InternVLService (group internvl.ai, version v1alpha1)."""
