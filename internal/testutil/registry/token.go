package registry

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const (
	tokenService = "obdtrace-test-registry"
	tokenIssuer  = "obdtrace-test-issuer"
)

// tokenServer is the authorization service of the distribution token-auth
// protocol (https://distribution.github.io/distribution/spec/auth/token/).
// The registry itself is the real server and verifies every token against
// the certificate written here; only the issuer lives in the test process,
// because Debian ships no standalone token service.
type tokenServer struct {
	realm    string
	certPath string
	key      *ecdsa.PrivateKey
	certDER  []byte
	users    map[string]string
	issued   atomic.Int64
}

func startTokenServer(t testing.TB, dir string, users map[string]string) *tokenServer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: tokenIssuer},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ts := &tokenServer{certPath: filepath.Join(dir, "token-root.pem"), key: key, certDER: der, users: users}
	if err := os.WriteFile(ts.certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(ts.serve))
	t.Cleanup(srv.Close)
	ts.realm = srv.URL + "/token"
	return ts
}

type resourceActions struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// serve answers both token flows containerd uses: OAuth2 POST with a
// password grant, and GET with basic credentials.
func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	var user, pass string
	var hasCreds bool
	var scopes []string
	if r.Method == http.MethodPost {
		if err := r.ParseForm(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		user, pass = r.PostForm.Get("username"), r.PostForm.Get("password")
		hasCreds = r.PostForm.Get("grant_type") == "password"
		scopes = strings.Fields(r.PostForm.Get("scope"))
	} else {
		user, pass, hasCreds = r.BasicAuth()
		for _, s := range r.URL.Query()["scope"] {
			scopes = append(scopes, strings.Fields(s)...)
		}
	}
	var access []resourceActions
	if hasCreds {
		if want, ok := ts.users[user]; !ok || want != pass {
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}`, http.StatusUnauthorized)
			return
		}
		access = parseScopes(scopes)
	}
	tok, err := ts.sign(user, access)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	ts.issued.Add(1)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"token": tok, "access_token": tok, "expires_in": 300,
		"issued_at": time.Now().UTC().Format(time.RFC3339),
	})
}

func parseScopes(scopes []string) []resourceActions {
	var out []resourceActions
	for _, s := range scopes {
		typ, rest, ok1 := strings.Cut(s, ":")
		i := strings.LastIndex(rest, ":")
		if !ok1 || i < 0 {
			continue
		}
		out = append(out, resourceActions{Type: typ, Name: rest[:i], Actions: strings.Split(rest[i+1:], ",")})
	}
	return out
}

// sign builds an ES256 JWT whose x5c header carries the self-signed root, so
// the registry's chain check (leaf verified against rootcertbundle) passes.
func (ts *tokenServer) sign(subject string, access []resourceActions) (string, error) {
	now := time.Now()
	header, err := json.Marshal(map[string]any{
		"typ": "JWT", "alg": "ES256",
		"x5c": []string{base64.StdEncoding.EncodeToString(ts.certDER)},
	})
	if err != nil {
		return "", err
	}
	if access == nil {
		access = []resourceActions{}
	}
	claims, err := json.Marshal(map[string]any{
		"iss": tokenIssuer, "sub": subject, "aud": tokenService,
		"exp": now.Add(5 * time.Minute).Unix(), "nbf": now.Add(-time.Minute).Unix(), "iat": now.Unix(),
		"jti": big.NewInt(now.UnixNano()).String(), "access": access,
	})
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, ts.key, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig), nil
}
