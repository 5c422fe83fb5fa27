package registry

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/obdtrace/obdtrace/internal/iox"
)

// ErrDockerConfig means a docker config file could not be parsed.
var ErrDockerConfig = errors.New("registry: invalid docker config")

// maxDockerConfigSize bounds the config file read into memory.
const maxDockerConfigSize = 1 << 20

// DockerConfigCredentials reads the docker CLI's config.json from dir ("" =
// $DOCKER_CONFIG, else ~/.docker) and returns a CredentialsFunc over its
// "auths" section. A missing file means anonymous access (nil, nil).
// Credential helpers (credsStore, credHelpers) are not run.
func DockerConfigCredentials(dir string) (CredentialsFunc, error) {
	if dir == "" {
		dir = os.Getenv("DOCKER_CONFIG")
	}
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return nil, nil // no home: nothing to read
		}
		dir = filepath.Join(home, ".docker")
	}
	path := filepath.Join(dir, "config.json")
	data, err := iox.ReadFileLimit(path, maxDockerConfigSize)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDockerConfig, err)
	}
	creds, err := ParseDockerConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return creds, nil
}

// ParseDockerConfig parses the "auths" section of a docker config.json: each
// entry is keyed by a registry host (optionally with scheme and path, as
// "https://index.docker.io/v1/") and holds either "auth" (base64
// "user:password"), "username" and "password", or an "identitytoken".
func ParseDockerConfig(data []byte) (CredentialsFunc, error) {
	var cfg struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			IdentityToken string `json:"identitytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDockerConfig, err)
	}
	type cred struct{ user, secret string }
	table := make(map[string]cred, len(cfg.Auths))
	for key, a := range cfg.Auths {
		c := cred{a.Username, a.Password}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("%w: auths[%q].auth: %w", ErrDockerConfig, key, err)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return nil, fmt.Errorf("%w: auths[%q].auth is not base64 of user:password", ErrDockerConfig, key)
			}
			c = cred{user, pass}
		}
		if a.IdentityToken != "" {
			c = cred{"", a.IdentityToken}
		}
		table[configHost(key)] = c
	}
	return func(host string) (string, string, error) {
		c := table[configHost(host)]
		return c.user, c.secret, nil
	}, nil
}

// configHost reduces a config key or request host to the bare host, mapping
// Docker Hub's several names to one.
func configHost(key string) string {
	h := key
	if i := strings.Index(h, "://"); i >= 0 {
		h = h[i+3:]
	}
	h, _, _ = strings.Cut(h, "/")
	switch h {
	case "docker.io", "registry-1.docker.io", "index.docker.io":
		return "index.docker.io"
	}
	return h
}
