"""Pure-torch losses: CLIP, FD, CRD, ICL, PM and their weighted total."""
