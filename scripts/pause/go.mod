module dinoflow.dev/pause

go 1.26.0
