package metricsrv

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

func TestServe(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "obd_test_total", Help: "test"})
	reg.MustRegister(c)
	c.Add(3)
	addr, stop, err := Serve("127.0.0.1:0", reg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "obd_test_total 3") {
		t.Errorf("/metrics lacks the counter:\n%s", body)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get("http://" + addr + "/metrics"); err == nil {
		t.Error("still serving after stop")
	}
	if _, _, err := Serve("256.0.0.1:1", reg, zerolog.Nop()); err == nil {
		t.Error("a bad address was accepted")
	}
}
