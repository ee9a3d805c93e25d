"""Infrastructure every other part builds on: devices, errors, atomic files, containers, memory."""
