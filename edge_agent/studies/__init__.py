"""Study assembly: instances -> series -> studies, and when a study is complete."""
