package boot

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/keygate/keygate/disk"
	"github.com/keygate/keygate/disk/luks2"
	"github.com/keygate/keygate/keymem"
	"github.com/keygate/keygate/keysvc/api"
	"github.com/keygate/keygate/keysvc/client"
)

// CreateConfig describes a new volume registered at the key service.
type CreateConfig struct {
	Image     string // must not exist
	KeysvcURL string // VM API URL, or several (replicas) separated by commas, written into the token
	AdminURL  string // admin API URL (https://HOST:PORT), or several, the UK is registered through
	CA        []byte // the key service's CA (PEM); its fingerprint goes into the token
	Token     string // admin bearer token
	VM        string
	Volume    string
	Options   disk.CreateOptions // PBKDF is forced to pbkdf2: the UK is random
}

// CreateVolume makes a 32-byte UK in locked memory, builds the image (UK as
// keyslot passphrase, keygate token naming KeysvcURL, Volume and the CA's
// fingerprint) beside Image, registers the UK at the key service for VM
// (admin volume import), and only then links the image into place.
//
// Nothing is left half-done: a failure before the registration removes the
// unfinished image; a failure to put the image in place after it (Image
// appeared meanwhile) erases the volume's key at the key service again, and
// says so, since the ID then cannot be reused.
func CreateVolume(ctx context.Context, cc CreateConfig) (*disk.Created, error) {
	if cc.Image == "" || cc.VM == "" || cc.Volume == "" || cc.KeysvcURL == "" || cc.AdminURL == "" || cc.Token == "" {
		return nil, errors.New("create volume: image, --keysvc, --vm, --volume, the admin URL and the admin token are required")
	}
	urls := client.ParseURLs(cc.KeysvcURL)
	for _, u := range urls {
		if !strings.HasPrefix(u, "https://") {
			return nil, fmt.Errorf("create volume: --keysvc %q must be an https URL", u)
		}
	}
	fp, err := CAFingerprint(cc.CA)
	if err != nil {
		return nil, fmt.Errorf("create volume: %w", err)
	}
	admin, err := client.New(client.Config{URLs: client.ParseURLs(cc.AdminURL), CA: cc.CA, Token: cc.Token})
	if err != nil {
		return nil, fmt.Errorf("create volume: %w", err)
	}
	defer admin.Close()
	if _, err := os.Lstat(cc.Image); err == nil {
		return nil, fmt.Errorf("create volume: %s exists; choose another name, or remove it first if its data is no longer needed", cc.Image)
	}
	uk, err := keymem.Random(api.UKSize)
	if err != nil {
		return nil, fmt.Errorf("create volume: %w", err)
	}
	defer uk.Destroy()

	tmp := filepath.Join(filepath.Dir(cc.Image), fmt.Sprintf(".%s.keygate-create-%d", filepath.Base(cc.Image), time.Now().UnixNano()))
	tok := luks2.KeygateToken{URL: urls[0], MoreURLs: urls[1:], VolumeID: cc.Volume, CASHA256: fp}
	res, err := createImage(tmp, uk.Bytes(), tok, cc.Options)
	if err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("create volume: %w", err)
	}
	placed := false
	defer func() {
		if !placed {
			res.Wipe()
			os.Remove(tmp)
		}
	}()
	if _, err := admin.AddVolume(ctx, api.VolumeRequest{ID: cc.Volume, VM: cc.VM, Key: uk.Bytes()}); err != nil {
		return nil, fmt.Errorf("create volume: register at the key service: %w (nothing was created)", adminHint(err, cc.AdminURL))
	}
	if err := linkNoClobber(tmp, cc.Image); err != nil {
		_, eraseErr := admin.Erase(ctx, cc.Volume)
		return nil, fmt.Errorf("create volume: put the image in place: %w; the volume's key was registered and has been erased again (%v), so choose a new --volume ID", err, eraseErr)
	}
	os.Remove(tmp)
	placed = true
	if in, err := disk.Inspect(cc.Image); err == nil {
		res.Info = in
	}
	return res, nil
}

// createImage makes the image at tmp (which must not exist). Without a
// recovery keyslot it formats it here, with the cheap volume-key digest
// (see digestIterations); with one it leaves the work to disk.CreateImage,
// which owns the recovery passphrase, and adds the token after.
func createImage(tmp string, uk []byte, tok luks2.KeygateToken, opts disk.CreateOptions) (*disk.Created, error) {
	if opts.Recovery {
		opts.PBKDF = disk.PBKDF2
		key, err := disk.NewKey(uk)
		if err != nil {
			return nil, err
		}
		res, err := disk.CreateImage(tmp, key, opts)
		key.Destroy()
		if err != nil {
			return nil, err
		}
		tok.Keyslot = res.KeySlot
		if err := writeToken(tmp, tok); err != nil {
			res.Wipe()
			return nil, err
		}
		return res, nil
	}
	if opts.SectorSize == 0 {
		opts.SectorSize = 4096
	}
	if opts.SectorSize != 512 && opts.SectorSize != 4096 {
		return nil, fmt.Errorf("sector size %d: use 512 or 4096", opts.SectorSize)
	}
	if opts.Size < disk.DataOffset+disk.MinFAT32Size {
		return nil, fmt.Errorf("--size %d bytes is too small: the LUKS2 header takes 16 MiB, so use at least %dM", opts.Size, (disk.DataOffset+disk.MinFAT32Size)>>20)
	}
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(opts.Size - opts.Size%int64(opts.SectorSize)); err != nil {
		return nil, err
	}
	if err := formatFile(f, uk, tok, opts.FS, opts.SectorSize, opts.Label); err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	return &disk.Created{KeySlot: 0, RecoverySlot: -1}, nil
}

func writeToken(path string, tok luks2.KeygateToken) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	vol, err := luks2.Open(f)
	if err != nil {
		return err
	}
	t, err := tok.Token()
	if err != nil {
		return err
	}
	if _, err := vol.AddToken(t); err != nil {
		return fmt.Errorf("write keygate token: %w", err)
	}
	return f.Sync()
}

// linkNoClobber puts tmp at path without replacing a file that appeared
// there meanwhile (disk.CreateImage does the same for its own temp file).
func linkNoClobber(tmp, path string) error {
	err := os.Link(tmp, path)
	if err == nil || errors.Is(err, fs.ErrExist) {
		return err
	}
	if _, serr := os.Lstat(path); serr == nil {
		return fmt.Errorf("%s appeared meanwhile: %w", path, fs.ErrExist)
	}
	return os.Rename(tmp, path)
}

// adminHint adds what to check to an admin API failure.
func adminHint(err error, adminURL string) error {
	var ue *UnreachableError
	switch {
	case errors.Is(err, ErrTLS):
		return fmt.Errorf("%w (pass --ca DATA/ca.pem)", err)
	case errors.As(err, &ue):
		return fmt.Errorf("reach the admin API at %s: %w (is `keysvc serve` running?)", adminURL, err)
	}
	return err
}
