package main

import (
	"fmt"

	"github.com/distribution/reference"
)

// registryHost returns the registry host of an image reference.
func registryHost(ref string) (string, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	return reference.Domain(named), nil
}
