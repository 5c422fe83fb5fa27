package main

import (
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/obdtrace/obdtrace/snapshotter"
)

// defaultConfigDir is searched for snapshotter.{yaml,toml,json} when no
// --config is given.
const defaultConfigDir = "/etc/obdtrace"

// keyDelimiter separates the levels of a config key inside viper.
const keyDelimiter = "::"

// flagKeys maps command-line flags to the config keys they override.
var flagKeys = map[string]string{
	"root":            "root",
	"address":         "address",
	"log-level":       "log_level",
	"log-format":      "log_format",
	"metrics-address": "metrics_address",
}

// loadConfig reads the configuration: defaults, then the file, then OBD_*
// environment variables (key path upper-cased, dots as underscores:
// OBD_REGISTRY_INSECURE), then the flags the user set.
func loadConfig(file string, flags *pflag.FlagSet) (snapshotter.Config, error) {
	// Map keys are registry hosts ("docker.io", "10.0.0.1:5000"): with
	// viper's default "." delimiter they would be split into nested keys.
	v := viper.NewWithOptions(viper.KeyDelimiter(keyDelimiter))
	setDefaults(v, "", reflect.ValueOf(snapshotter.DefaultConfig()))
	v.SetEnvPrefix("OBD")
	v.SetEnvKeyReplacer(strings.NewReplacer(keyDelimiter, "_"))
	v.AutomaticEnv()
	if file == "" {
		file = v.GetString("config")
	}
	if file != "" {
		v.SetConfigFile(file)
	} else {
		v.SetConfigName("snapshotter")
		v.AddConfigPath(defaultConfigDir)
	}
	if err := v.ReadInConfig(); err != nil {
		var notFound viper.ConfigFileNotFoundError
		if file != "" || !errors.As(err, &notFound) {
			return snapshotter.Config{}, fmt.Errorf("config: %w", err)
		}
	}
	for name, key := range flagKeys {
		// Only flags set on the command line override: a flag's default
		// must not hide the file's or the environment's value.
		if f := flags.Lookup(name); f != nil && f.Changed {
			v.Set(key, f.Value.String())
		}
	}
	var cfg snapshotter.Config
	if err := v.Unmarshal(&cfg); err != nil {
		return snapshotter.Config{}, fmt.Errorf("config: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return snapshotter.Config{}, err
	}
	return cfg, nil
}

// setDefaults registers every key of the config struct with its default,
// which is also what lets viper map OBD_* variables onto nested keys.
func setDefaults(v *viper.Viper, prefix string, val reflect.Value) {
	t := val.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("mapstructure")
		if tag == "" || tag == "-" {
			continue
		}
		key := prefix + tag
		if f.Type.Kind() == reflect.Struct {
			setDefaults(v, key+keyDelimiter, val.Field(i))
			continue
		}
		v.SetDefault(key, val.Field(i).Interface())
	}
}
