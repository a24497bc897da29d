package keysvc_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/tpm"
)

// TestImportKeyFileSize: an imported key file must fit the TPM object the
// unwrap key travels in. One that does is stored and unlocks to the same
// bytes; one that does not (cryptsetup's default 4 KiB key file) is
// refused at import with a 400 naming the limit and what to do, and no
// volume is created, rather than stored and failing every unlock with 500.
func TestImportKeyFileSize(t *testing.T) {
	e := startEnv(t, t.TempDir())
	v := openVM(t)
	setup(t, e, v, "sizes")
	for _, tc := range []struct {
		id   string
		size int
		code int
		want string // in the error, for a refusal
	}{
		{"size-1", 1, http.StatusCreated, ""},
		{"size-32", 32, http.StatusCreated, ""},
		{"size-128", api.MaxKeyFile, http.StatusCreated, ""},
		{"size-129", api.MaxKeyFile + 1, http.StatusBadRequest, "key file is 129 bytes; an unwrap key sealed to a TPM holds at most 128"},
		{"size-4096", 4096, http.StatusBadRequest, "key file is 4096 bytes"}, // cryptsetup's default
		{"size-8192", 8 << 10, http.StatusBadRequest, "key file is 8192 bytes"},
		{"size-0", 0, http.StatusBadRequest, "key file is empty"},
	} {
		t.Run(tc.id, func(t *testing.T) {
			id := tc.id
			key := bytes.Repeat([]byte{0xa5}, tc.size)
			// json.RawMessage: VolumeRequest's omitempty would turn an
			// empty key into a create.
			req := json.RawMessage(fmt.Sprintf(`{"id":%q,"vm":"sizes","key":%q}`, id, base64.StdEncoding.EncodeToString(key)))
			body := e.admin(t, "POST", "/v1/admin/volumes", req, tc.code)
			if tc.code != http.StatusCreated {
				var eb api.ErrorBody
				if err := json.Unmarshal(body, &eb); err != nil {
					t.Fatalf("error body %s: %v", body, err)
				}
				if !strings.Contains(eb.Error, tc.want) || eb.Hint == "" {
					t.Fatalf("refusal %+v; want %q and a hint", eb, tc.want)
				}
				if tc.size > api.MaxKeyFile && !strings.Contains(eb.Hint, "keygate disk add-key") {
					t.Fatalf("hint %q does not say how to add a shorter key", eb.Hint)
				}
				// Nothing was stored: the ID is still free.
				e.admin(t, "POST", "/v1/admin/volumes", api.VolumeRequest{ID: id, VM: "sizes", Key: ukBytes}, http.StatusCreated)
				return
			}
			code, out := e.unlock(t, v, "sizes", id)
			if code != http.StatusOK {
				t.Fatalf("unlock: %d %s", code, out)
			}
			uk, err := v.importBlob(t, out, tpm.ECC)
			if err != nil {
				t.Fatalf("import blob: %v", err)
			}
			if !bytes.Equal(uk, key) {
				t.Fatalf("unlocked %d bytes, want the %d imported", len(uk), len(key))
			}
		})
	}
}
