"""diffsqueeze.pipelines."""
