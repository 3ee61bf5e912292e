"""The STARFlow2 demo (`python -m launch.demo`): phases (what runs, in order, resumable), evaluation
outputs (generated images, answers, documents, scores), the summary."""
